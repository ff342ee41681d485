//! Who runs what (docs/security.md, "Which code runs as which role").
//!
//! pg_nudge's own SQL (capture, run_due, the worker, the functions that write
//! the catalog) runs as the extension's owner with the search path pinned to
//! `pg_catalog, nudge, pg_temp`, whatever the caller's path: no name in it can
//! resolve to an object another role created (CVE-2018-1058). SQL that users
//! wrote into definitions runs as the role that defined it, in a security
//! restricted operation, and every setting it changes is undone when it
//! returns, so that nothing it does outlives the call in a privileged session.
//! This is how PostgreSQL itself runs index expressions or REFRESH
//! MATERIALIZED VIEW as the table's owner.

use pgrx::pg_sys;
use pgrx::prelude::*;

/// The role that owns the extension's objects (the owner of schema `nudge`,
/// created by CREATE EXTENSION, which only a superuser may run).
pub fn extension_owner() -> pg_sys::Oid {
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"nudge".as_ptr(), false);
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
            pg_sys::Datum::from(nsp),
        );
        if tuple.is_null() {
            error!("pg_nudge: schema nudge is gone");
        }
        let form = (*tuple)
            .t_data
            .cast::<u8>()
            .add((*(*tuple).t_data).t_hoff as usize)
            as *const pg_sys::FormData_pg_namespace;
        let owner = (*form).nspowner;
        pg_sys::ReleaseSysCache(tuple);
        owner
    }
}

/// The role the caller is acting as (inside our functions, which are not
/// SECURITY DEFINER, the session's current role).
pub fn current_role() -> pg_sys::Oid {
    unsafe { pg_sys::GetUserId() }
}

fn set(name: &std::ffi::CStr, value: &std::ffi::CStr) {
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
    }
}

/// Runs `f` with the search path pinned to `pg_catalog, nudge, pg_temp` and
/// standard_conforming_strings on, as a function's `SET` clauses would. An
/// ERROR inside unwinds the settings with the (sub)transaction.
pub fn pinned<R>(f: impl FnOnce() -> R) -> R {
    unsafe {
        let level = pg_sys::NewGUCNestLevel();
        set(c"search_path", c"pg_catalog, nudge, pg_temp");
        // how our SQL text reads its literals must not be the caller's choice
        set(c"standard_conforming_strings", c"on");
        let r = f();
        pg_sys::AtEOXact_GUC(true, level);
        r
    }
}

/// Runs `f` as the extension's owner with the pinned search path: our own
/// statements, for whoever called (a writer's INSERT, an admin's
/// define_trigger). `f` must run only SQL text of ours.
pub fn as_extension<R>(f: impl FnOnce() -> R) -> R {
    unsafe {
        let (mut user, mut context) = (pg_sys::InvalidOid, 0);
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            extension_owner(),
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
        let r = pinned(f);
        pg_sys::SetUserIdAndSecContext(user, context);
        r
    }
}

/// Runs `f` (a call of one definer's generated function) as `definer`, in a
/// security restricted operation (no SET ROLE, no temporary objects, no
/// cursors left open), and undoes every setting changed inside, a plain
/// `SET` included, before our own statements go on. Call it inside a
/// subtransaction: an ERROR then restores role and settings with it.
pub fn as_definer<R>(definer: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    unsafe {
        let (mut user, mut context) = (pg_sys::InvalidOid, 0);
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            definer,
            context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        let level = pg_sys::NewGUCNestLevel();
        let r = f();
        // false: roll back every change made inside, as an aborted
        // subtransaction would (index builds undo user code's SETs this way)
        pg_sys::AtEOXact_GUC(false, level);
        pg_sys::SetUserIdAndSecContext(user, context);
        r
    }
}

/// Raises 42501 unless the current role may register `table` as a source:
/// it owns it, or holds TRIGGER and SELECT on it (what CREATE TRIGGER and
/// reading its events would ask of it).
pub fn check_source_rights(table: pg_sys::Oid, name: &str, verb: &str) {
    unsafe {
        let me = current_role();
        let owner = pg_sys::pg_class_ownercheck(table, me);
        let granted = pg_sys::pg_class_aclcheck(table, me, pg_sys::ACL_TRIGGER as pg_sys::AclMode)
            == pg_sys::AclResult::ACLCHECK_OK
            && pg_sys::pg_class_aclcheck(table, me, pg_sys::ACL_SELECT as pg_sys::AclMode)
                == pg_sys::AclResult::ACLCHECK_OK;
        if !owner && !granted {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("{verb}: permission denied for table {name}"),
                "the role must own the table, or hold TRIGGER and SELECT on it"
            );
        }
    }
}
