"""Draw the README's "Your own model" picture: Grad-CAM of torchvision ConvNeXt-T (random weights:
no pretrained weights offline) at its measured default layer (NCHW) and at an NHWC layer inside its
last block, side by side, as the CLI's captioned figures.

    .venv/bin/python tools/readme_any_model.py [docs/any-model-convnext.jpg]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PIL import Image


def main() -> None:
    import skimage

    import convscope
    from convscope.probes.layers import map_layer

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/any-model-convnext.jpg")
    model = convscope.load_model("torchvision:convnext_tiny", "random", seed=0)
    photo = convscope.load_image(Path(skimage.data_dir) / "chelsea.png")
    tiles = []
    with tempfile.TemporaryDirectory() as folder:
        for layer in (model.cam_layer, "features.7.2.block.5"):
            found = map_layer(model, layer)
            print(f"{layer}: {found.layout.describe()} ({found.layout.conversion() or 'read as it is'})")
            path = Path(folder) / f"{layer}.png"
            convscope.gradcam(model, photo, layer=layer).save(path, photo, model=model)
            tiles.append(Image.open(path).convert("RGB"))
    height = max(t.height for t in tiles)
    sheet = Image.new("RGB", (sum(t.width for t in tiles), height), "white")
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width
    sheet.thumbnail((1400, 1400))
    sheet.save(out, quality=88)
    print(f"wrote {out} ({sheet.width}x{sheet.height})")


if __name__ == "__main__":
    main()
