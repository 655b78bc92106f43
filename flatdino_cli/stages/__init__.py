"""Stage wiring: each stage builds a train.Task (model, data, loss) and hands it to train.fit."""
