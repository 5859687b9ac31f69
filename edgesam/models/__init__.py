"""Models: the student encoder, EdgeSAM assembly and checkpoints, official EdgeSAM weights, teachers, the RPN,
prompted decoding."""
