"""The verification stage: metrics, flow re-analysis, verdicts and reports."""
