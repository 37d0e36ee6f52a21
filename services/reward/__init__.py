"""RewardService: scores (prompt, response, target) items with weighted reward functions."""
