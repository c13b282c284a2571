"""Dataset builders: each turns a public dataset (or generated data) into the ikdmil layout with a manifest."""
