"""Model construction and loading; no Ray here. The tiny and the real models load through one path."""
