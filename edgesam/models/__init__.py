"""Models: the student encoder, EdgeSAM assembly and checkpoints, teachers, the RPN, prompted decoding."""
