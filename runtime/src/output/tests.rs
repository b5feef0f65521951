use super::*;

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Regression (issue 18 row 12): a directory created at `quantize --out` / `merge --out`
/// during the run was silently deleted.
/// Issue 18: a failed write into `new/parents/out` leaves no `new/` behind.
#[test]
fn parents_created_for_a_failed_write_are_removed() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("new/parents/out");
    let r: Result<()> = write_dir_atomically(&out, |_| Err(Error::Input("no".into())));
    assert!(r.is_err());
    assert!(!root.path().join("new").exists(), "the parents made for the write are gone");
    write_dir_atomically(&out, |tmp| fs::write(tmp.join("f"), "x").map_err(|e| Error::io(tmp, e))).unwrap();
    assert!(out.join("f").is_file(), "a successful write keeps them");
}

#[test]
fn a_directory_that_appears_during_the_run_is_left_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let err = write_dir_atomically(&out, |t| {
        fs::create_dir(&out).unwrap();
        fs::write(out.join("mine.txt"), "user data").unwrap();
        fs::write(t.join("model.safetensors"), "x").map_err(|e| Error::io(t, e))
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("already exists") && err.contains("untouched"), "{err}");
    assert_eq!(fs::read_to_string(out.join("mine.txt")).unwrap(), "user data");
    assert_eq!(names(tmp.path()), ["out"]);
    // Even an empty directory that appeared meanwhile is not replaced.
    let out2 = tmp.path().join("out2");
    let r = write_dir_atomically(&out2, |_| fs::create_dir(&out2).map_err(|e| Error::io(&out2, e)));
    assert!(r.is_err());
}

/// Regression (issue 18 row 12): two writers racing for one new directory both succeeded,
/// the last one winning.
#[test]
fn two_writers_racing_for_one_path_do_not_both_succeed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let outer = write_dir_atomically_with(&out, Replace::Nothing, |t| {
        fs::write(t.join("who"), "outer").unwrap();
        write_dir_atomically(&out, |t2| fs::write(t2.join("who"), "inner").map_err(|e| Error::io(t2, e)))
    });
    assert!(outer.is_err(), "the second writer must fail");
    assert_eq!(fs::read_to_string(out.join("who")).unwrap(), "inner");
    assert_eq!(names(tmp.path()), ["out"]);
}

#[test]
fn replace_existing_replaces_only_what_was_there_at_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("old"), "x").unwrap();
    write_dir_atomically_with(&out, Replace::Existing, |t| fs::write(t.join("new"), "y").map_err(|e| Error::io(t, e)))
        .unwrap();
    assert_eq!(names(&out), ["new"]);
    assert_eq!(names(tmp.path()), ["out"]);
    // An empty directory at the start that is filled meanwhile is not replaced.
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let r = write_dir_atomically_with(&empty, Replace::EmptyDir, |_| {
        fs::write(empty.join("theirs"), "z").map_err(|e| Error::io(&empty, e))
    });
    assert!(r.is_err());
    assert_eq!(names(&empty), ["theirs"]);
}

/// Regression (issue 18 row 13): temporaries of killed runs were left forever.
#[test]
fn stale_temporaries_of_dead_processes_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = tmp.path().join(format!(".out.peftrt-tmp-{dead}"));
    fs::create_dir(&stale).unwrap();
    fs::write(stale.join("model.safetensors"), "partial").unwrap();
    let stale_file = tmp.path().join(format!(".out.peftrt-tmp-{dead}-abc123"));
    fs::write(&stale_file, "partial").unwrap();
    // Process 1 runs: its temporary may be in use and stays, as do other names.
    let live = tmp.path().join(".out.peftrt-tmp-1-xyz");
    fs::create_dir(&live).unwrap();
    fs::write(tmp.path().join(".other.peftrt-tmp-999999999"), "").unwrap();
    write_dir_atomically(&tmp.path().join("out"), |_| Ok(())).unwrap();
    assert_eq!(names(tmp.path()), [".other.peftrt-tmp-999999999", ".out.peftrt-tmp-1-xyz", "out"]);
}

#[test]
fn live_temporaries_are_listed_until_dropped() {
    // (Not removing them here: other tests' temporaries are in the same list.)
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let guard = register_temporary(&a);
    assert!(live_temporaries().contains(&a));
    drop(guard);
    assert!(!live_temporaries().contains(&a));
    fs::create_dir(&a).unwrap();
    fs::write(a.join("f"), "x").unwrap();
    assert!(remove_path(&a) && !a.exists());
}

/// Regression (issue 18 row 11): `X.tmp` beside the output was overwritten and removed, and
/// an output that was the input, a directory or in a missing directory failed only at the end.
#[test]
fn files_are_written_through_unique_temporaries_and_checked_first() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.jsonl");
    let unrelated = tmp.path().join("x.tmp");
    fs::write(&unrelated, "keep me").unwrap();
    check_output_file(&out, &[&unrelated]).unwrap();
    write_file_atomically(&out, b"result\n").unwrap();
    assert_eq!(fs::read_to_string(&unrelated).unwrap(), "keep me");
    assert_eq!(fs::read_to_string(&out).unwrap(), "result\n");
    assert_eq!(names(tmp.path()), ["x.jsonl", "x.tmp"]);
    let err = check_output_file(&out, &[&out]).unwrap_err().to_string();
    assert!(err.contains("is also the input"), "{err}");
    let err = check_output_file(tmp.path(), &[]).unwrap_err().to_string();
    assert!(err.contains("not a regular file"), "{err}");
    let err = check_output_file(&tmp.path().join("no/such/x.jsonl"), &[]).unwrap_err().to_string();
    assert!(err.contains("does not exist"), "{err}");
    let err = check_output_file(Path::new("/dev/null"), &[]).unwrap_err().to_string();
    assert!(err.contains("not a regular file"), "{err}");
}
