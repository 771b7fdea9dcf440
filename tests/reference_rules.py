"""Rules the tests compare against."""

from steerdiff.guidance import GuidanceRule


class EvaluateAll(GuidanceRule):
    """``rule``'s combination with both predictions of every sample evaluated (the default ``predictions_needed``):
    the reference for rules that skip rows or whole network calls."""

    def __init__(self, rule):
        self.rule = rule

    def reset(self, timesteps=None):
        self.rule.reset(timesteps)

    def __call__(self, cond, uncond, state):
        return self.rule(cond, uncond, state)
