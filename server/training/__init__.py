"""Prompt tuning on the served model (issue 13): training examples, and a trainer that optimises only a
task's soft prompt over the frozen base model, as PEFT's prompt tuning does."""
