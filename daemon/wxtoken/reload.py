"""What a reload (SIGHUP, `systemctl reload wxtoken`, `wxtoken reload`) would change: a pure
comparison of the running config with the new one. The daemon applies it, or refuses it.

Applied without a restart: apps added (they start refreshing), removed (they stop; their files
stay until they expire), changed (they take their new settings); and the top-level
refresh_interval, renew_before, daily_budget, api_base and ca_bundle (every app takes them).
Unchanged apps keep their schedule and make no upstream call.

Only a restart changes: state_dir, control_socket, log_format, metrics_file, the [redis] table,
the [components.NAME] tables and callback_listen (and a secret_credential systemd has not
loaded: LoadCredential= is read at start).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from wxtoken.config import Config

RESTART_KEYS = ("state_dir", "control_socket", "log_format", "metrics_file", "redis",
                "components", "callback_listen")
APP_WIDE_KEYS = ("refresh_interval", "renew_before", "daily_budget", "api_base", "ca_bundle")


@dataclass(frozen=True)
class Plan:
    """The difference between two configs, app by app."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]  # including every app when an app-wide key changed
    unchanged: tuple[str, ...]
    needs_restart: tuple[str, ...]  # top-level keys a reload cannot change
    new_client: bool  # api_base, ca_bundle or renew_before (the call deadline) changed
    watch_changed: tuple[str, ...] = ()  # only quota_watch changed: the refresher is kept

    def problems(self, path: str) -> list[str]:
        return [f"{path}: {key}: changed, which takes a restart (systemctl restart wxtoken); "
                "the running config stays" for key in self.needs_restart]

    def summary(self) -> str:
        parts = [f"{what} {', '.join(names)}" for what, names in (
            ("added", self.added), ("removed", self.removed), ("changed", self.changed),
            ("quota_watch changed for", self.watch_changed)) if names]
        return "; ".join(parts) or "nothing changed"


def plan(old: Config, new: Config) -> Plan:
    old_apps = {app.name: app for app in old.apps}
    new_apps = {app.name: app for app in new.apps}
    app_wide = any(getattr(old, k) != getattr(new, k) for k in APP_WIDE_KEYS)
    common = [name for name in new_apps if name in old_apps]
    # quota_watch is the quota tools' business, not the refresher's
    changed = tuple(n for n in common if app_wide or replace(old_apps[n], quota_watch=())
                    != replace(new_apps[n], quota_watch=()))
    watch_changed = tuple(n for n in common if n not in changed
                          and old_apps[n].quota_watch != new_apps[n].quota_watch)
    return Plan(
        added=tuple(n for n in new_apps if n not in old_apps),
        removed=tuple(n for n in old_apps if n not in new_apps),
        changed=changed,
        unchanged=tuple(n for n in common if n not in changed and n not in watch_changed),
        needs_restart=tuple(k for k in RESTART_KEYS if getattr(old, k) != getattr(new, k)),
        new_client=any(getattr(old, k) != getattr(new, k)
                       for k in ("api_base", "ca_bundle", "renew_before")),
        watch_changed=watch_changed,
    )
