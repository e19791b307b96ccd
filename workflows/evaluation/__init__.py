"""Measuring a model downstream: suites of fine-tuning tasks run as Ray Tune trials
(`bertflow eval`), scorecards attached to model versions (`registry show/compare`), and
domain-adaptive pretraining judged by its scorecard (`bertflow adapt`)."""
