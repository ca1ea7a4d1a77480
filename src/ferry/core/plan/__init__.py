"""The migration planner's pure part: facts, rules, estimates, order, policy, plan file."""
