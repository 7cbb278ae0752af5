"""The CausalT2I losses (paper Section III): SaCD (Eq. 9), SCaG (Eqs. 10–11), CdO (Eq. 12), total (Eq. 13)."""
