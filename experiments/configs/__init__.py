"""Study configurations; each module defines `get_study()`."""
