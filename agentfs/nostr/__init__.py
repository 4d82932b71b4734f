"""Nostr without the network: NIP-01 events, NIP-44/NIP-04 encryption, NIP-17 gift wraps.

Relay code lives elsewhere (drivers/); nothing here opens a socket or touches a store.
"""
