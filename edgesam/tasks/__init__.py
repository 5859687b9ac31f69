"""The trainers, each a `TrainTask` built with `from_config`: the reference teacher, encoder KD
(phase 1), prompt-in-the-loop KD (phase 2) and the granularity-prior RPN."""
