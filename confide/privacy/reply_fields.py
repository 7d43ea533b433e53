"""The metrics a node's training reply may carry, by name (`confide.wire` re-exports them
as its METRICS keys). Which of them a reply carries is its privacy mode's rule
(`confide.privacy.mode_rules.ModeRules.reply_fields`)."""

NUM_EXAMPLES = "num-examples"  # the public (rounded) row count under DP
EPSILON = "epsilon"
STEPS = "steps"
SAMPLE_RATE = "sample-rate"
NOISE_MULTIPLIER = "noise-multiplier"
TRAIN_LOSS = "train-loss"  # un-noised: only without any DP
TRAIN_SECONDS = "train-seconds"  # un-noised: only without any DP

# what every training reply says: the public row count and the mechanism it ran (fixed
# before the round from public values), its claimed epsilon
PUBLIC = (NUM_EXAMPLES, EPSILON, STEPS, SAMPLE_RATE, NOISE_MULTIPLIER)
# un-noised statistics of the records
RAW = (TRAIN_LOSS, TRAIN_SECONDS)
