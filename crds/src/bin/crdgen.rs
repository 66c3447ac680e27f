//! Prints the generated CustomResourceDefinitions as YAML (`cargo run -p kpipe-api --bin crdgen`): the
//! ConsumerPipeline CRD, or with `replay` the DeadLetterReplay CRD.

use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = if std::env::args().nth(1).as_deref() == Some("replay") {
        kpipe_api::replay_crd_yaml()
    } else {
        kpipe_api::crd_yaml()
    };
    match yaml {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("crdgen: cannot serialise the CRD: {err}");
            ExitCode::FAILURE
        }
    }
}
