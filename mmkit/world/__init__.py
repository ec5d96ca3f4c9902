"""The reference world: procedurally generated scenes with exact truth, and questions about them."""
