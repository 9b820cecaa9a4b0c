"""Findings that a results file carries under notes.findings (docs/reproduction.md has the measurements)."""

FINDINGS: list[str] = [
    "The uniform Euler rule is the wrong sampler for a student trained on the mean velocity over [0, t]: even the "
    "exact student leaves the data distribution with 2 and 4 steps (closed-form Gaussian flow: sample std 1.36x and "
    "1.65x the data's; gmm: off-mode mass 0.003 -> 0.013 -> 0.062), while re-noising with fresh noise "
    "(student_sample mode 'consistency') keeps it exact at every step count.",
]
