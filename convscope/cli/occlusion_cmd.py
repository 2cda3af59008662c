"""The ``occlusion`` command is generated from the method registry (``convscope.cli.methods_cmd``)
like every method command; its pictures, records and warnings come from the method's renderer,
``convscope.render.views.occlusion_views``. This module stays for code that imports it."""
