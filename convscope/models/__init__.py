"""Built-in architectures, their presets and weight loading."""
