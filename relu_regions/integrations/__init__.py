"""Integrations with other libraries (Captum, Lightning); each imports its library only when used."""
