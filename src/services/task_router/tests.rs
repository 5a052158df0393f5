use super::*;

fn slot(id: i32, capabilities: &[&str], load: i64, max: Option<i64>) -> Slot {
    Slot {
        id,
        droplet_id: id * 10,
        capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
        max,
        heartbeat: None,
        load,
        schemas: serde_json::Map::new(),
        contracts: HashMap::new(),
    }
}

fn task(id: i32, capability: Option<&str>, last: Option<i32>) -> PendingTask {
    PendingTask {
        id,
        key: "k".into(),
        required_capability: capability.map(str::to_string),
        last_droplet_id: last,
        urgency: 5,
        created_at: NaiveDateTime::default(),
    }
}

#[test]
fn a_plan_gives_each_task_the_least_loaded_droplet_with_its_capability_and_room() {
    let contracts = Contracts::new(
        prometheus::IntCounterVec::new(prometheus::Opts::new("t", "t"), &["site", "outcome"])
            .expect("a counter"),
    );
    let payloads = HashMap::new();
    let fit = Fit {
        payloads: &payloads,
        memo: RefCell::new(contracts.memo(Site::Routing)),
    };
    let mut slots = vec![
        slot(1, &["ocr"], 0, Some(1)),
        slot(2, &["verify"], 3, None),
        slot(3, &["verify", "ocr"], 1, None),
        slot(4, &["verify"], 1, None),
    ];
    let pending = vec![
        task(100, Some("ocr"), None),
        task(101, Some("ocr"), None),
        task(102, Some("verify"), Some(3)),
        task(103, None, None),
        task(104, Some("translate"), None),
    ];
    let moves = plan(&mut slots, &pending, &fit);
    let chosen: Vec<(i32, Option<i32>)> = moves.iter().map(|m| (m.task_id, m.assign_to)).collect();
    // 100: droplet 1 (load 0); 101: droplet 1 is full, so 3; 102: 4 (3 is as loaded but
    // ran it last); 103: any droplet, the least loaded (4 and 3 at 2 now: 3 first in order,
    // ties on heartbeat); 104: nobody has the capability.
    assert_eq!(
        chosen,
        vec![
            (100, Some(1)),
            (101, Some(3)),
            (102, Some(4)),
            (103, Some(3))
        ]
    );
    let why = moves[1].event_extra.as_deref().expect("why");
    let candidates: Vec<i64> = why["router"]["candidates"]
        .as_array()
        .expect("candidates")
        .iter()
        .filter_map(|c| c["droplet_id"].as_i64())
        .collect();
    assert_eq!(
        candidates,
        vec![30],
        "only droplets with the capability and room"
    );
    assert!(std::ptr::eq(
        moves[1].metadata.as_deref().expect("metadata"),
        why
    ));
}
