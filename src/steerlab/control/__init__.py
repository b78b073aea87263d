"""Model-based control of the residual stream: block Jacobians and LQR gains (A-LQR)."""
