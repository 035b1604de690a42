"""Detection data: COCO and PASCAL VOC readers, DETR transforms, and the offline digits-COCO generator."""
