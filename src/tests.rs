//! In-server tests of the SQL surface; behaviour over time and across
//! connections is tested in tests/pg_regress and tests/integration.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn define_trigger_returns_increasing_versions() {
        Spi::run("SELECT nudge.define_template('t', 'Hi {{ profile.first_name | default: \"there\" }}', '<p>x</p>')").unwrap();
        let def = r#"'{"on": {"event": "cart_added"}, "wait": "1 hour", "template": "t"}'"#;
        let v1 = Spi::get_one::<i32>(&format!("SELECT nudge.define_trigger('c', {def})")).unwrap();
        let v2 = Spi::get_one::<i32>(&format!("SELECT nudge.define_trigger('c', {def})")).unwrap();
        assert_eq!((v1, v2), (Some(1), Some(2)));
    }

    #[pg_test(
        error = "define_trigger(c): unless[0].evnt: unknown field `evnt`, expected one of `event`, `where`, `same_key`"
    )]
    fn misspelled_key_is_an_error_naming_its_path() {
        Spi::run("SELECT nudge.define_template('t', 's', 'h')").unwrap();
        Spi::run(r#"SELECT nudge.define_trigger('c', '{"on": {"event": "a"}, "unless": [{"evnt": "b"}], "template": "t"}')"#)
        .unwrap();
    }

    #[pg_test]
    fn track_opens_an_enrollment_in_the_same_transaction() {
        Spi::run("SELECT nudge.define_template('t', 's', 'h')").unwrap();
        Spi::run(r#"SELECT nudge.define_trigger('c', '{"on": {"event": "cart_added", "key": "cart"}, "wait": "1 hour", "template": "t"}')"#).unwrap();
        Spi::run(r#"SELECT nudge.track('u1', 'cart_added', '{"cart": "k1"}')"#).unwrap();
        let state = Spi::get_one::<String>(
            "SELECT state || '/' || key FROM nudge.enrollments WHERE user_id = 'u1'",
        )
        .unwrap();
        assert_eq!(state.as_deref(), Some("waiting/k1"));
    }
}
