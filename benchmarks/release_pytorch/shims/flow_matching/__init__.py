"""Import-only placeholders for the release's vendored `flow_matching` (only its
CondOT/dopri5 branch uses it; the measured linear_flow paths never do)."""
