"""medtl: transfer learning for medical image classification."""
__version__ = "0.1.0"
