"""ResNet as a backbone: object detection (Faster R-CNN + FPN) and semantic segmentation (U-Net, FCN)."""
