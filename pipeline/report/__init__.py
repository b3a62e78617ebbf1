"""Figures drawn from warehouse tables, and the HTML report."""
