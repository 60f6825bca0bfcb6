//! Running as an ordinary user: the primary binds first (so port 80 works
//! as root), then gives up root for good, before any worker starts; the
//! workers inherit the user. The same order as nginx or gunicorn.
//!
//! The drop is `setgroups([gid])`, `setgid`, `setuid`, then a check that
//! root cannot be regained. A slot's `SO_REUSEPORT` socket created later
//! (scaling up in reuseport mode) is bound as that user, so a privileged
//! port cannot be added to after the drop.

use nix::unistd::{Gid, Group, Uid, User, getgid, getuid, setgid, setgroups, setuid};

use super::PrimaryError;

/// The user (and group) to run as, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub user: String,
    pub uid: Uid,
    pub gid: Gid,
}

fn config(message: String) -> PrimaryError {
    PrimaryError::Config(message)
}

/// Looks up `user` (a name or a number) and `group` (a name or a number;
/// default: the user's primary group). `None` when neither is asked for.
///
/// # Errors
/// An unknown user or group, or a process that is not root and so cannot
/// become anyone else.
pub(crate) fn resolve(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<Option<Identity>, PrimaryError> {
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let (name, uid, user_gid) = match user {
        Some(u) => {
            let found = match u.parse::<u32>() {
                Ok(n) => User::from_uid(Uid::from_raw(n)),
                Err(_) => User::from_name(u),
            }
            .map_err(|e| config(format!("cannot look up user `{u}`: {e}")))?
            .ok_or_else(|| config(format!("no such user `{u}`")))?;
            (found.name, found.uid, found.gid)
        }
        None => {
            let uid = getuid();
            let name = User::from_uid(uid)
                .ok()
                .flatten()
                .map_or_else(|| uid.to_string(), |u| u.name);
            (name, uid, getgid())
        }
    };
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => Gid::from_raw(n),
            Err(_) => {
                Group::from_name(g)
                    .map_err(|e| config(format!("cannot look up group `{g}`: {e}")))?
                    .ok_or_else(|| config(format!("no such group `{g}`")))?
                    .gid
            }
        },
        None => user_gid,
    };
    let me = getuid();
    if !me.is_root() && (uid != me || gid != getgid()) {
        return Err(config(format!(
            "--user/--group need root to switch users (running as uid {me})"
        )));
    }
    Ok(Some(Identity {
        user: name,
        uid,
        gid,
    }))
}

/// Becomes `id` for good: supplementary groups, group, then user.
///
/// # Errors
/// When the kernel refuses any step, or root could be regained after.
pub(crate) fn drop_to(id: &Identity) -> Result<(), PrimaryError> {
    if getuid() == id.uid && getgid() == id.gid {
        return Ok(());
    }
    let fail = |what: &str, e: nix::Error| config(format!("cannot {what}: {e}"));
    setgroups(&[id.gid]).map_err(|e| fail("set supplementary groups", e))?;
    setgid(id.gid).map_err(|e| fail(&format!("switch to group {}", id.gid), e))?;
    setuid(id.uid).map_err(|e| fail(&format!("switch to user {}", id.user), e))?;
    if !id.uid.is_root() && setuid(Uid::from_raw(0)).is_ok() {
        return Err(config("root could be regained after dropping it".into()));
    }
    Ok(())
}
