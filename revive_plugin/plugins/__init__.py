"""Built-in plugins (registered exactly like third-party ones; see ``revive_plugin.host.DEFAULT_PLUGINS``)."""
