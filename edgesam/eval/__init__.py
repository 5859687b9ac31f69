"""Evaluation: one prompting engine (`engine`), its datasets, mIoU runs, proposal AP and speed."""
