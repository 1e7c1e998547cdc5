"""The rest of the RL math beside the losses: advantages, KL anchors (the iterative reference), KL estimators."""
