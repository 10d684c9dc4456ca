"""What leaves a fit: every figure (arrays in, Figure out), the logger bridge, the html/md/json report writers."""
