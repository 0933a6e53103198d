"""Command-line interface (`clipforge ...`)."""
