"""KFP v2 pipelines over the components in components/."""
