"""Evaluation metrics: classification accuracy, COCO/LVIS box mAP (pycocotools), grounding IoU."""
