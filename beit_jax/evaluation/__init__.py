"""Evaluation on a validation split, shared by the trainers that score one: classification
(top-1 / top-5, fine-tuning and linear probing, and its `best/` checkpoint) and semantic
segmentation (mmseg's mIoU, and the pixel loss)."""
