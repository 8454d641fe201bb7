"""Stage ``train-generalist``: one model trained on hard labels; a teacher like any other."""
