"""What the operator commands do beyond the daemon: prove and repair drift
(reconcile), and move a collection to another model without downtime (reindex)."""
