"""edgesam: prompt-in-the-loop distillation of Segment Anything into edge CNN students."""

__version__ = "0.1.0"
