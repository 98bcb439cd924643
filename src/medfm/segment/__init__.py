"""Segmentation downstream: a U-Net on any pre-trained encoder, 2D and 3D (``medfm segment``)."""
