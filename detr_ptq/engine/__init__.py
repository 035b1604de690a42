"""Training, inference and COCO evaluation loops."""
