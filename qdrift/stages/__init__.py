"""The stages of a run: build -> quantize -> calibrate -> generate -> evaluate -> log."""
