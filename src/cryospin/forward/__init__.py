"""The image-formation model as pure, differentiable tensor functions."""
