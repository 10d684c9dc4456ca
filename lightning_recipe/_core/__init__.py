"""What every check shares: conventions (batch, forward, loss, task, head), label statistics, the fit context,
the base class, warn-once."""
