"""Findings of the `small` run and its ablations (docs/reproduction.md has the numbers); stored in results.json
under notes.findings so that a results file carries its own reading."""

FINDINGS: list[str] = [
    "With the preset's hyper-parameters neither of the paper's 1-step orderings holds: on the mixture CM is the "
    "best 1-step student and VM+VD diverges; on the shapes no student beats the undistilled teacher's single step "
    "on the teacher-referenced metrics (that teacher's 1-step samples are already close to its 25-step ones).",
    "VM+VD's divergence on the mixture is a step-size effect of VD (the gradient on the fake sample is the VM "
    "residual there, self-reinforcing once samples leave the data): it diverges for every delta (0.01-0.05), the "
    "JVP variant, w_vd in {0, 0.5, 2, 100} and with or without d_norm, and trains stably with lr 2e-5, "
    "lambda_vd 0.01 or logit-normal mean 1, where VM+VD beats VM at 1 step (paper's none > VM > VM+VD holds).",
    "d_norm (dv/dt / (||dv/dt|| + 0.1)) caps the curvature correction on 8-D samples: without it VM's 1-step "
    "error on the mixture drops from 0.64 to 0.25 (sliced W2 vs. the teacher) while its 2/4-step errors rise; "
    "d_norm off + lambda_vd 0.1 gives the best 1-step student of all runs (0.146, 3 seeds), found by tuning MDT only.",
    "The paper's CFG strengths (w_vm 40, w_vd 100) are far outside what these small teachers tolerate; every "
    "objective uses the teacher's sampling CFG instead.",
]
