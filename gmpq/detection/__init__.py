"""Detection transfer: policies searched on resnet18 / vgg16 applied to the backbones of torchvision Faster R-CNN
(ResNet-18 FPN) and SSD300 (VGG-16), fine-tuned and scored with VOC mAP and COCO AP (``gmpq finetune-det``,
``gmpq evaluate-det``)."""
