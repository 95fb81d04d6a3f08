//! A local Solana cluster for tests, behind one JSON-RPC URL, backed by LiteSVM: the
//! real SPL Token and Memo programs execute every transaction, so a delegate's
//! allowance, a balance, a wrong signer, a bad account or a fee payer without SOL
//! behave as on mainnet.
//!
//! It is as unkind as a load-balanced mainnet endpoint:
//! - **Several nodes** ([`Node`]): each request goes to the next node round-robin, or to
//!   the node the script names. Each node has its own lag (slots behind the tip) and
//!   its own history window; every answer carries that node's `context.slot`, and a
//!   node behind a request's `minContextSlot` answers the real -32016 error.
//! - **Commitment moves over blocks**: a transaction is `processed` in the block it
//!   lands in, `confirmed` one block later, `finalized` 32 blocks later, as each node
//!   sees it; `commitment` is honoured on every method that takes it, and address
//!   history is not served below `confirmed` (the real error).
//! - **Slots are not heights**: every fourth block skips a slot.
//! - **Preflight runs on the node's own view**: it answers `AlreadyProcessed` only for
//!   a transaction it has seen land, knows only blockhashes it has seen, and simulates
//!   against the accounts as they are now, so a lagging node can refuse a resend of a
//!   transaction that already moved the money (its status view has not caught up).
//! - **Forwarding is lossy**: a node may answer with the signature and the leader
//!   drop the transaction, or hold it and land it later ([`FakeSolana::land_held`]), or
//!   land it with an instruction error (the fee is paid, nothing moves).
//! - **The delegate's SOL is finite** (0.05 SOL to start): fees are charged, and a
//!   delegate that runs out gets `InsufficientFundsForFee` / `AccountNotFound`.
//!
//! Blocks advance only when the test says so ([`FakeSolana::advance`]) or on a clock
//! ([`FakeSolana::produce_blocks`]); a blockhash is valid for 150 blocks after the
//! block it was issued in.
//!
//! One approximation: account state (what preflight simulates against, and
//! `getAccountInfo`) is the tip's on every node; a node's lag shows in its statuses,
//! histories, blockhashes and heights. That is the more hostile way round for the
//! charge protocol (a state ahead of the status view refuses resends that landed).
//!
//! Include with `#[path = "common/solana.rs"] mod solana;` (it links LiteSVM, so only
//! the test binaries that need it pay for it).
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use litesvm::LiteSVM;
use serde_json::{Value, json};
use solana_account::Account;
use solana_address::Address;
use solana_hash::Hash;
use solana_keypair::Keypair;
use solana_message::Message;
use solana_program_pack::Pack;
use solana_signature::Signature;
use solana_signer::Signer;
use solana_transaction::Transaction;
use solana_transaction_error::TransactionError;
use solana_transaction_status_client_types::UiTransactionError;
use spl_token_interface::state::{Account as TokenAccount, AccountState, Mint};

pub const VALID_BLOCKS: u64 = 150;
/// Blocks after landing at which a transaction is `confirmed` / `finalized`.
pub const CONFIRMED_DEPTH: u64 = 1;
pub const FINALIZED_DEPTH: u64 = 32;
/// What `getSignatureStatuses` sees without `searchTransactionHistory`: the status
/// cache's slots.
const STATUS_CACHE_SLOTS: u64 = 300;
/// The delegate's SOL at the start: 0.05 SOL, ten thousand fees.
pub const DELEGATE_LAMPORTS: u64 = 50_000_000;
pub const FEE: u64 = 5_000;
const USDC_DECIMALS: u8 = 6;

/// One node behind the URL.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    /// Slots behind the tip.
    pub lag: u64,
    /// Slots of history it serves back from its own slot (statuses with history,
    /// address histories, transactions).
    pub history: u64,
}

impl Default for Node {
    fn default() -> Self {
        Node {
            lag: 0,
            history: u64::MAX,
        }
    }
}

/// What the cluster does wrong next. Counters are spent one request at a time.
#[derive(Debug, Default, Clone)]
pub struct Script {
    /// `sendTransaction` answers with the signature but the leader drops it.
    pub drop_sends: usize,
    /// `sendTransaction` answers with the signature; the transaction is held and
    /// lands when the test calls [`FakeSolana::land_held`] (if still valid then).
    pub hold_sends: usize,
    /// `sendTransaction` lands the transaction with an instruction error: the fee is
    /// paid, nothing moves.
    pub fail_on_land: usize,
    /// `sendTransaction` never answers and the transaction does not land.
    pub hang_sends_before: usize,
    /// `sendTransaction` lands the transaction, then never answers (a timeout after
    /// the cluster accepted it).
    pub hang_sends_after: usize,
    /// `getSignatureStatuses` never answers.
    pub hang_statuses: usize,
    /// `getLatestBlockhash` never answers.
    pub hang_blockhash: usize,
    /// The next requests, of any method, answer HTTP 503.
    pub unavailable: usize,
    /// The node each next request goes to, by method name (`"*"` for any); a method
    /// with nothing queued goes round-robin.
    pub route: HashMap<String, VecDeque<usize>>,
}

impl Script {
    /// Sends the next request of `method` to node `node`.
    pub fn route(&mut self, method: &str, node: usize) {
        self.route
            .entry(method.to_string())
            .or_default()
            .push_back(node);
    }
}

#[derive(Clone, Copy)]
struct Block {
    slot: u64,
    height: u64,
    hash: Hash,
}

struct Landed {
    signature: Signature,
    slot: u64,
    height: u64,
    err: Option<TransactionError>,
    memo: Option<String>,
    accounts: Vec<Address>,
    bytes: Vec<u8>,
}

struct State {
    svm: LiteSVM,
    blocks: Vec<Block>,
    landed: Vec<Landed>,
    held: Vec<(Transaction, Vec<u8>)>,
    nodes: Vec<Node>,
    next_node: usize,
    script: Script,
    sends: usize,
    hung: usize,
    requests: HashMap<String, usize>,
    fee_payer: Address,
}

impl State {
    fn tip(&self) -> Block {
        *self.blocks.last().expect("a genesis block")
    }

    /// The block a node at `lag` has as its newest at `commitment`.
    fn bank(&self, node: Node, commitment: &str) -> Block {
        let tip = self.tip();
        let slot = tip.slot.saturating_sub(node.lag);
        let seen = self
            .blocks
            .iter()
            .rev()
            .find(|b| b.slot <= slot)
            .copied()
            .unwrap_or(self.blocks[0]);
        let depth = match commitment {
            "processed" => 0,
            "finalized" | "max" | "root" => FINALIZED_DEPTH,
            _ => CONFIRMED_DEPTH,
        };
        let h = seen.height.saturating_sub(depth);
        self.blocks
            .iter()
            .find(|b| b.height == h)
            .copied()
            .unwrap_or(self.blocks[0])
    }

    /// How a node sees a landed transaction at its processed bank: `None` when it is
    /// not there (not yet, or beyond its history), else its depth in blocks.
    fn depth(&self, node: Node, l: &Landed, window: u64) -> Option<u64> {
        let bank = self.bank(node, "processed");
        (l.slot <= bank.slot && bank.slot - l.slot <= window.min(node.history))
            .then(|| bank.height - l.height)
    }

    fn last_valid(&self, hash: &Hash, up_to_slot: u64) -> Option<u64> {
        self.blocks
            .iter()
            .find(|b| b.hash == *hash && b.slot <= up_to_slot)
            .map(|b| b.height + VALID_BLOCKS)
    }
}

fn depth_meets(depth: u64, commitment: &str) -> bool {
    match commitment {
        "processed" => true,
        "finalized" | "max" | "root" => depth >= FINALIZED_DEPTH,
        _ => depth >= CONFIRMED_DEPTH,
    }
}

pub struct FakeSolana {
    pub url: String,
    pub mint: Address,
    pub treasury: Address,
    /// The delegate's keypair in `solana-keygen` JSON form (what the worker loads).
    pub delegate_json: String,
    pub delegate: Address,
    mint_authority: Keypair,
    st: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
    producer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for FakeSolana {
    fn drop(&mut self) {
        self.server.abort();
        if let Some(p) = self.producer.lock().unwrap().take() {
            p.abort();
        }
    }
}

impl FakeSolana {
    /// One honest node.
    pub async fn start() -> FakeSolana {
        Self::cluster(vec![Node::default()]).await
    }

    /// Several nodes behind one URL.
    pub async fn cluster(nodes: Vec<Node>) -> FakeSolana {
        assert!(!nodes.is_empty());
        // Duplicates and blockhashes are judged by the nodes here, each on its own
        // view; LiteSVM only executes (its own history would answer AlreadyProcessed
        // where a node that has not seen the transaction simulates it again).
        let mut svm = LiteSVM::new()
            .with_blockhash_check(false)
            .with_transaction_history(0);
        let mint_authority = Keypair::new();
        let mint = Address::new_unique();
        let mut data = vec![0u8; Mint::LEN];
        Mint {
            mint_authority: Some(mint_authority.pubkey()).into(),
            supply: 0,
            decimals: USDC_DECIMALS,
            is_initialized: true,
            freeze_authority: None.into(),
        }
        .pack_into_slice(&mut data);
        svm.set_account(mint, token_program_account(&svm, data))
            .unwrap();
        let delegate = Keypair::new();
        svm.airdrop(&delegate.pubkey(), DELEGATE_LAMPORTS).unwrap();
        let genesis = Block {
            slot: 1_000,
            height: 0,
            hash: svm.latest_blockhash(),
        };
        let st = Arc::new(Mutex::new(State {
            svm,
            blocks: vec![genesis],
            landed: Vec::new(),
            held: Vec::new(),
            nodes,
            next_node: 0,
            script: Script::default(),
            sends: 0,
            hung: 0,
            requests: HashMap::new(),
            fee_payer: delegate.pubkey(),
        }));
        let app = axum::Router::new()
            .route("/", axum::routing::post(rpc))
            .with_state(st.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let mut fake = FakeSolana {
            url: format!("http://{addr}"),
            mint,
            treasury: Address::default(),
            delegate_json: format!("{:?}", delegate.to_bytes().to_vec()),
            delegate: delegate.pubkey(),
            mint_authority,
            st,
            server,
            producer: Mutex::new(None),
        };
        fake.treasury = fake.token_account(&Keypair::new().pubkey(), 0, None);
        fake
    }

    /// Changes the nodes (their lags and history windows) from now on.
    pub fn set_nodes(&self, nodes: Vec<Node>) {
        assert!(!nodes.is_empty());
        self.st.lock().unwrap().nodes = nodes;
    }

    /// A token account of `owner` holding `amount` of the mint, optionally with an
    /// allowance for a delegate (written directly, as if approved earlier).
    fn token_account(
        &self,
        owner: &Address,
        amount: u64,
        delegate: Option<(Address, u64)>,
    ) -> Address {
        self.token_account_of(self.mint, owner, amount, delegate)
    }

    /// An escrow written directly: of any mint, approved for any delegate (for the
    /// cases a customer gets wrong). Its history holds one opening transaction.
    pub fn raw_escrow(
        &self,
        mint: Option<Address>,
        amount: u64,
        delegate: Option<(Address, u64)>,
    ) -> String {
        let mint = mint.unwrap_or(self.mint);
        let a = self.token_account_of(mint, &Address::new_unique(), amount, delegate);
        self.opened(a);
        a.to_string()
    }

    /// Records an account's creation in its history (as a real account has one), in
    /// a finalized block.
    fn opened(&self, account: Address) {
        let mut st = self.st.lock().unwrap();
        let tip = st.blocks[st.blocks.len().saturating_sub(1 + FINALIZED_DEPTH as usize)];
        st.landed.push(Landed {
            signature: Keypair::new().sign_message(b"opened"),
            slot: tip.slot,
            height: tip.height,
            err: None,
            memo: None,
            accounts: vec![account],
            bytes: Vec::new(),
        });
    }

    /// A second mint (same decimals), for wrong-mint cases.
    pub fn other_mint(&self) -> Address {
        let mut st = self.st.lock().unwrap();
        let mint = Address::new_unique();
        let mut data = vec![0u8; Mint::LEN];
        Mint {
            mint_authority: Some(self.mint_authority.pubkey()).into(),
            supply: 0,
            decimals: USDC_DECIMALS,
            is_initialized: true,
            freeze_authority: None.into(),
        }
        .pack_into_slice(&mut data);
        let acc = token_program_account(&st.svm, data);
        st.svm.set_account(mint, acc).unwrap();
        mint
    }

    fn token_account_of(
        &self,
        mint: Address,
        owner: &Address,
        amount: u64,
        delegate: Option<(Address, u64)>,
    ) -> Address {
        let mut st = self.st.lock().unwrap();
        let address = Address::new_unique();
        let mut data = vec![0u8; TokenAccount::LEN];
        TokenAccount {
            mint,
            owner: *owner,
            amount,
            delegate: delegate.map(|d| d.0).into(),
            state: AccountState::Initialized,
            is_native: None.into(),
            delegated_amount: delegate.map_or(0, |d| d.1),
            close_authority: None.into(),
        }
        .pack_into_slice(&mut data);
        let acc = token_program_account(&st.svm, data);
        st.svm.set_account(address, acc).unwrap();
        address
    }

    /// A customer's escrow: a USDC token account holding `balance` units, whose owner
    /// then approves the delegate for `allowance` units with a real `approve_checked`
    /// transaction, the way a customer sets it up (it is the account's first
    /// history entry).
    pub fn open_escrow(&self, balance: u64, allowance: u64) -> String {
        let owner = Keypair::new();
        let account = self.token_account(&owner.pubkey(), balance, None);
        let ix = spl_token_interface::instruction::approve_checked(
            &spl_token_interface::id(),
            &account,
            &self.mint,
            &self.delegate,
            &owner.pubkey(),
            &[],
            allowance,
            USDC_DECIMALS,
        )
        .unwrap();
        let mut st = self.st.lock().unwrap();
        st.svm.airdrop(&owner.pubkey(), 1_000_000_000).unwrap();
        let hash = st.tip().hash;
        let tx = Transaction::new(&[&owner], Message::new(&[ix], Some(&owner.pubkey())), hash);
        let bytes = wincode::serialize(&tx).unwrap();
        land(&mut st, tx, bytes, None).expect("approve_checked");
        // Opened a while ago: its approval sits in a finalized block, before any
        // charge could be signed against it.
        let old = st.blocks[st.blocks.len().saturating_sub(1 + FINALIZED_DEPTH as usize)];
        let l = st.landed.last_mut().expect("just landed");
        (l.slot, l.height) = (old.slot, old.height);
        account.to_string()
    }

    /// Someone else sends `amount` from an account of their own to the treasury with
    /// the charge memo of `intent` (anyone can), optionally touching `escrow` in the
    /// same transaction (a zero transfer to it), so that it shows in that account's
    /// history as well.
    pub fn send_foreign_charge(&self, intent: &str, amount: u64, escrow: Option<&str>) -> String {
        let owner = Keypair::new();
        let from = self.token_account(&owner.pubkey(), amount, None);
        let transfer = |to: &Address, amount| {
            spl_token_interface::instruction::transfer_checked(
                &spl_token_interface::id(),
                &from,
                &self.mint,
                to,
                &owner.pubkey(),
                &[],
                amount,
                USDC_DECIMALS,
            )
            .unwrap()
        };
        let mut ixs = vec![transfer(&self.treasury, amount)];
        if let Some(e) = escrow {
            ixs.push(transfer(&e.parse().unwrap(), 0));
        }
        ixs.push(spl_memo_interface::instruction::build_memo(
            &spl_memo_interface::v3::id(),
            format!("longshore:charge:{intent}").as_bytes(),
            &[&owner.pubkey()],
        ));
        let mut st = self.st.lock().unwrap();
        st.svm.airdrop(&owner.pubkey(), 1_000_000_000).unwrap();
        let hash = st.tip().hash;
        let tx = Transaction::new(&[&owner], Message::new(&ixs, Some(&owner.pubkey())), hash);
        let sig = tx.signatures[0].to_string();
        let bytes = wincode::serialize(&tx).unwrap();
        land(&mut st, tx, bytes, None).expect("a foreign transfer");
        sig
    }

    pub fn script(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.st.lock().unwrap().script);
    }

    /// Produces `n` blocks, each with a new blockhash valid for 150 blocks; every
    /// fourth block skips a slot.
    pub fn advance(&self, n: u64) {
        advance(&mut self.st.lock().unwrap(), n);
    }

    /// Produces a block every `every` from now on (for tests that run a worker
    /// process and cannot step the chain themselves).
    pub fn produce_blocks(&self, every: Duration) {
        let st = self.st.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                advance(&mut st.lock().unwrap(), 1);
            }
        });
        if let Some(old) = self.producer.lock().unwrap().replace(task) {
            old.abort();
        }
    }

    /// Lands the transactions held by `hold_sends` whose blockhash is still valid.
    pub fn land_held(&self) -> usize {
        let mut st = self.st.lock().unwrap();
        let held = std::mem::take(&mut st.held);
        let mut n = 0;
        for (tx, bytes) in held {
            let tip = st.tip();
            let valid = st
                .last_valid(&tx.message.recent_blockhash, tip.slot)
                .is_some_and(|v| tip.height <= v);
            let dup = st.landed.iter().any(|l| l.signature == tx.signatures[0]);
            if valid && !dup {
                land(&mut st, tx, bytes, None).ok();
                n += 1;
            }
        }
        n
    }

    /// Sets the delegate's SOL (0 removes its account, as an emptied account is).
    pub fn set_delegate_lamports(&self, lamports: u64) {
        let mut st = self.st.lock().unwrap();
        let d = st.fee_payer;
        st.svm
            .set_account(
                d,
                Account {
                    lamports,
                    data: vec![],
                    owner: Address::default(),
                    executable: false,
                    rent_epoch: 0,
                },
            )
            .unwrap();
    }

    pub fn delegate_lamports(&self) -> u64 {
        let st = self.st.lock().unwrap();
        st.svm.get_account(&st.fee_payer).map_or(0, |a| a.lamports)
    }

    pub fn height(&self) -> u64 {
        self.st.lock().unwrap().tip().height
    }

    pub fn slot(&self) -> u64 {
        self.st.lock().unwrap().tip().slot
    }

    /// How many `sendTransaction` requests arrived.
    pub fn sends(&self) -> usize {
        self.st.lock().unwrap().sends
    }

    /// How many requests of `method` arrived.
    pub fn requests(&self, method: &str) -> usize {
        self.st
            .lock()
            .unwrap()
            .requests
            .get(method)
            .copied()
            .unwrap_or(0)
    }

    /// How many requests are hanging (or hung before their client went away).
    pub fn hung(&self) -> usize {
        self.st.lock().unwrap().hung
    }

    /// The token amount in an account (0 if it does not exist).
    pub fn balance(&self, address: &str) -> u64 {
        self.token(address).map_or(0, |t| t.amount)
    }

    pub fn token(&self, address: &str) -> Option<TokenAccount> {
        let st = self.st.lock().unwrap();
        let acc = st.svm.get_account(&address.parse().unwrap())?;
        TokenAccount::unpack(&acc.data).ok()
    }

    /// Successful transactions the delegate signed carrying a charge memo, with
    /// their memos.
    pub fn charges_landed(&self) -> Vec<String> {
        let st = self.st.lock().unwrap();
        st.landed
            .iter()
            .filter(|l| l.err.is_none() && l.accounts.first() == Some(&st.fee_payer))
            .filter_map(|l| l.memo.clone())
            .filter(|m| m.contains("longshore:charge:"))
            .collect()
    }
}

fn advance(st: &mut State, n: u64) {
    for _ in 0..n {
        let tip = st.tip();
        st.svm.expire_blockhash();
        let height = tip.height + 1;
        let skip = u64::from(height.is_multiple_of(4));
        st.blocks.push(Block {
            slot: tip.slot + 1 + skip,
            height,
            hash: st.svm.latest_blockhash(),
        });
    }
}

/// Executes a transaction at the tip and records it; `fail`: lands it with that
/// error instead (fee charged, nothing else moves).
fn land(
    st: &mut State,
    tx: Transaction,
    bytes: Vec<u8>,
    fail: Option<TransactionError>,
) -> Result<(), TransactionError> {
    let tip = st.tip();
    let err = match fail {
        Some(e) => {
            let payer = tx.message.account_keys[0];
            if let Some(mut a) = st.svm.get_account(&payer) {
                a.lamports = a.lamports.saturating_sub(FEE);
                st.svm.set_account(payer, a).unwrap();
            }
            Some(e)
        }
        None => st.svm.send_transaction(tx.clone()).err().map(|f| f.err),
    };
    st.landed.push(Landed {
        signature: tx.signatures[0],
        slot: tip.slot,
        height: tip.height,
        err: err.clone(),
        memo: memo_of(&tx),
        accounts: tx.message.account_keys.clone(),
        bytes,
    });
    err.map_or(Ok(()), Err)
}

fn token_program_account(svm: &LiteSVM, data: Vec<u8>) -> Account {
    Account {
        lamports: svm.minimum_balance_for_rent_exemption(data.len()),
        data,
        owner: spl_token_interface::id(),
        executable: false,
        rent_epoch: 0,
    }
}

fn memo_of(tx: &Transaction) -> Option<String> {
    let keys = &tx.message.account_keys;
    tx.message.instructions.iter().find_map(|ix| {
        let program = keys.get(ix.program_id_index as usize)?;
        (*program == spl_memo_interface::v3::id() || *program == spl_memo_interface::v1::id())
            .then(|| String::from_utf8_lossy(&ix.data).into_owned())
    })
}

fn ok(id: &Value, result: Value) -> Response {
    Json(json!({"jsonrpc": "2.0", "result": result, "id": id})).into_response()
}

fn rpc_error(id: &Value, code: i64, message: &str, data: Value) -> Response {
    Json(json!({"jsonrpc": "2.0", "error": {"code": code, "message": message, "data": data}, "id": id}))
        .into_response()
}

/// A `sendTransaction` refused in preflight, the way a node reports it.
fn preflight(id: &Value, err: TransactionError, logs: Vec<String>) -> Response {
    let message = format!("Transaction simulation failed: {err}");
    let data = json!({
        "err": serde_json::to_value(UiTransactionError::from(err)).unwrap(),
        "logs": logs,
        "accounts": null,
        "unitsConsumed": 0,
        "returnData": null,
        "innerInstructions": null,
    });
    rpc_error(id, -32002, &message, data)
}

fn min_context_slot_not_reached(id: &Value, slot: u64) -> Response {
    rpc_error(
        id,
        -32016,
        "Minimum context slot has not been reached",
        json!({"contextSlot": slot}),
    )
}

fn address_param(v: &Value) -> Option<Address> {
    v.as_str()?.parse().ok()
}

fn bad_address(id: &Value) -> Response {
    rpc_error(
        id,
        -32602,
        "Invalid param: not a valid address",
        Value::Null,
    )
}

fn context(slot: u64) -> Value {
    json!({"slot": slot, "apiVersion": "4.2.2"})
}

fn ui_err(e: &Option<TransactionError>) -> Value {
    e.clone().map_or(Value::Null, |e| {
        serde_json::to_value(UiTransactionError::from(e)).unwrap()
    })
}

fn take(n: &mut usize) -> bool {
    let t = *n > 0;
    if t {
        *n -= 1;
    }
    t
}

async fn hang(st: &Arc<Mutex<State>>) -> Response {
    st.lock().unwrap().hung += 1;
    std::future::pending::<()>().await;
    unreachable!()
}

/// The config object of a request (the last param, if it is an object).
fn config_of(params: &Value) -> Value {
    params
        .as_array()
        .and_then(|a| a.iter().rev().find(|v| v.is_object()).cloned())
        .unwrap_or(Value::Null)
}

fn commitment_of(config: &Value, key: &str) -> String {
    config[key].as_str().unwrap_or("finalized").to_string()
}

async fn rpc(AxState(st): AxState<Arc<Mutex<State>>>, Json(req): Json<Value>) -> Response {
    let id = req["id"].clone();
    let params = req["params"].clone();
    let method = req["method"].as_str().unwrap_or_default().to_string();
    let config = config_of(&params);
    let node = {
        let mut s = st.lock().unwrap();
        *s.requests.entry(method.clone()).or_default() += 1;
        if take(&mut s.script.unavailable) {
            return (StatusCode::SERVICE_UNAVAILABLE, "node unavailable").into_response();
        }
        let routed = s
            .script
            .route
            .get_mut(&method)
            .and_then(VecDeque::pop_front)
            .or_else(|| s.script.route.get_mut("*").and_then(VecDeque::pop_front));
        let i = routed.unwrap_or_else(|| {
            s.next_node = (s.next_node + 1) % s.nodes.len();
            s.next_node
        });
        s.nodes[i % s.nodes.len()]
    };
    let commitment = commitment_of(&config, "commitment");
    // minContextSlot is checked against the bank the request is answered from.
    if let Some(min) = config["minContextSlot"].as_u64() {
        let s = st.lock().unwrap();
        let key = if method == "sendTransaction" {
            "preflightCommitment"
        } else {
            "commitment"
        };
        let bank = s.bank(node, &commitment_of(&config, key));
        if bank.slot < min {
            return min_context_slot_not_reached(&id, bank.slot);
        }
    }
    match method.as_str() {
        "getVersion" => ok(&id, json!({"solana-core": "4.2.2", "feature-set": 0})),
        "getLatestBlockhash" => {
            let answer = {
                let mut s = st.lock().unwrap();
                if take(&mut s.script.hang_blockhash) {
                    None
                } else {
                    let b = s.bank(node, &commitment);
                    Some(json!({"context": context(b.slot), "value": {
                        "blockhash": b.hash.to_string(),
                        "lastValidBlockHeight": b.height + VALID_BLOCKS}}))
                }
            };
            match answer {
                Some(a) => ok(&id, a),
                None => hang(&st).await,
            }
        }
        "getBlockHeight" => {
            let s = st.lock().unwrap();
            ok(&id, json!(s.bank(node, &commitment).height))
        }
        "getEpochInfo" => {
            let s = st.lock().unwrap();
            let b = s.bank(node, &commitment);
            ok(
                &id,
                json!({"absoluteSlot": b.slot, "blockHeight": b.height, "epoch": 0,
                       "slotIndex": b.slot, "slotsInEpoch": 432_000, "transactionCount": null}),
            )
        }
        "getBalance" => {
            let s = st.lock().unwrap();
            let Some(address) = address_param(&params[0]) else {
                return bad_address(&id);
            };
            let b = s.bank(node, &commitment);
            let lamports = s.svm.get_account(&address).map_or(0, |a| a.lamports);
            ok(&id, json!({"context": context(b.slot), "value": lamports}))
        }
        "sendTransaction" => send(&st, node, &id, &params, &config).await,
        "getSignatureStatuses" => {
            if take(&mut st.lock().unwrap().script.hang_statuses) {
                return hang(&st).await;
            }
            let s = st.lock().unwrap();
            if params[0].as_array().is_some_and(|a| a.len() > 256) {
                return rpc_error(
                    &id,
                    -32602,
                    "Too many inputs provided; max 256",
                    Value::Null,
                );
            }
            let window = if config["searchTransactionHistory"].as_bool() == Some(true) {
                u64::MAX
            } else {
                STATUS_CACHE_SLOTS
            };
            let value: Vec<Value> = params[0]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|sig| {
                    let sig = sig.as_str().unwrap_or_default();
                    s.landed
                        .iter()
                        .find(|l| l.signature.to_string() == sig)
                        .and_then(|l| s.depth(node, l, window).map(|d| (l, d)))
                        .map_or(Value::Null, |(l, depth)| {
                            let err = ui_err(&l.err);
                            let status = match &l.err {
                                None => json!({"Ok": null}),
                                Some(_) => json!({"Err": err}),
                            };
                            let (confirmations, level) = if depth >= FINALIZED_DEPTH {
                                (Value::Null, "finalized")
                            } else if depth >= CONFIRMED_DEPTH {
                                (json!(depth), "confirmed")
                            } else {
                                (json!(0), "processed")
                            };
                            json!({"slot": l.slot, "confirmations": confirmations, "status": status,
                                   "err": err, "confirmationStatus": level})
                        })
                })
                .collect();
            let b = s.bank(node, "processed");
            ok(&id, json!({"context": context(b.slot), "value": value}))
        }
        "getSignaturesForAddress" => {
            let s = st.lock().unwrap();
            let Some(address) = address_param(&params[0]) else {
                return bad_address(&id);
            };
            if commitment == "processed" {
                return rpc_error(
                    &id,
                    -32602,
                    "Method does not support commitment below `confirmed`",
                    Value::Null,
                );
            }
            let limit = config["limit"].as_u64().unwrap_or(1000);
            if limit == 0 || limit > 1000 {
                return rpc_error(&id, -32602, "Invalid limit; max 1000", Value::Null);
            }
            let before = config["before"].as_str();
            let list: Vec<Value> = s
                .landed
                .iter()
                .rev()
                // Newest first; `before`: only what is older than that signature.
                .skip_while(|l| before.is_some_and(|b| l.signature.to_string() != b))
                .skip(usize::from(before.is_some()))
                .filter(|l| l.accounts.contains(&address))
                .filter_map(|l| {
                    let d = s.depth(node, l, u64::MAX)?;
                    depth_meets(d, &commitment).then_some((l, d))
                })
                .take(limit as usize)
                .map(|(l, d)| {
                    json!({
                        "signature": l.signature.to_string(),
                        "slot": l.slot,
                        "err": ui_err(&l.err),
                        // A node reports memos as "[length] text".
                        "memo": l.memo.as_ref().map(|m| format!("[{}] {m}", m.len())),
                        "blockTime": null,
                        "confirmationStatus": if d >= FINALIZED_DEPTH { "finalized" } else { "confirmed" },
                    })
                })
                .collect();
            ok(&id, json!(list))
        }
        "getAccountInfo" => {
            let s = st.lock().unwrap();
            let Some(address) = address_param(&params[0]) else {
                return bad_address(&id);
            };
            let value = s.svm.get_account(&address).map_or(Value::Null, |a| {
                json!({
                    "data": [base64::engine::general_purpose::STANDARD.encode(&a.data), "base64"],
                    "executable": a.executable,
                    "lamports": a.lamports,
                    "owner": a.owner.to_string(),
                    "rentEpoch": a.rent_epoch,
                    "space": a.data.len(),
                })
            });
            let b = s.bank(node, &commitment);
            ok(&id, json!({"context": context(b.slot), "value": value}))
        }
        "getTransaction" => {
            let s = st.lock().unwrap();
            let sig = params[0].as_str().unwrap_or_default();
            let found = s
                .landed
                .iter()
                .find(|l| l.signature.to_string() == sig)
                .filter(|l| {
                    s.depth(node, l, u64::MAX)
                        .is_some_and(|d| depth_meets(d, &commitment))
                });
            match found {
                None => ok(&id, Value::Null),
                Some(l) => {
                    let err = ui_err(&l.err);
                    let status = match &l.err {
                        None => json!({"Ok": null}),
                        Some(_) => json!({"Err": err}),
                    };
                    ok(
                        &id,
                        json!({
                            "slot": l.slot,
                            "transaction": [base64::engine::general_purpose::STANDARD.encode(&l.bytes), "base64"],
                            "meta": {"err": err, "status": status, "fee": FEE,
                                     "preBalances": [], "postBalances": []},
                            "blockTime": null,
                        }),
                    )
                }
            }
        }
        other => rpc_error(
            &id,
            -32601,
            &format!("Method not found: {other}"),
            Value::Null,
        ),
    }
}

async fn send(
    st: &Arc<Mutex<State>>,
    node: Node,
    id: &Value,
    params: &Value,
    config: &Value,
) -> Response {
    let Some(bytes) = params[0]
        .as_str()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
    else {
        return rpc_error(id, -32602, "invalid transaction: not base64", Value::Null);
    };
    let Ok(tx) = wincode::deserialize::<Transaction>(&bytes) else {
        return rpc_error(
            id,
            -32602,
            "invalid transaction: failed to deserialize",
            Value::Null,
        );
    };
    let preflight_commitment = commitment_of(config, "preflightCommitment");
    let skip_preflight = config["skipPreflight"].as_bool() == Some(true);
    let processed = process(
        &mut st.lock().unwrap(),
        node,
        &preflight_commitment,
        skip_preflight,
        id,
        tx,
        bytes,
    );
    match processed {
        Ok(r) => r,
        Err(Hang) => hang(st).await,
    }
}

struct Hang;

/// `sendTransaction` as a node does it: preflight on its own view (duplicates it has
/// seen, blockhashes it knows, a simulation), then a lossy forward to the leader at
/// the tip, with the script's faults. `Err(Hang)`: the answer never comes.
fn process(
    s: &mut State,
    node: Node,
    preflight_commitment: &str,
    skip_preflight: bool,
    id: &Value,
    tx: Transaction,
    bytes: Vec<u8>,
) -> Result<Response, Hang> {
    let signature = tx.signatures[0];
    s.sends += 1;
    if take(&mut s.script.hang_sends_before) {
        return Err(Hang);
    }
    let bank = s.bank(node, preflight_commitment);
    if !skip_preflight {
        let seen = s.landed.iter().any(|l| {
            l.signature == signature
                && s.depth(node, l, STATUS_CACHE_SLOTS).is_some()
                && l.slot <= bank.slot
        });
        if seen {
            return Ok(preflight(id, TransactionError::AlreadyProcessed, vec![]));
        }
        match s.last_valid(&tx.message.recent_blockhash, bank.slot) {
            Some(valid) if bank.height <= valid => {}
            _ => return Ok(preflight(id, TransactionError::BlockhashNotFound, vec![])),
        }
        if let Err(f) = s.svm.simulate_transaction(tx.clone()) {
            return Ok(preflight(id, f.err, f.meta.logs));
        }
    }
    let answer = ok(id, json!(signature.to_string()));
    // The leader, at the tip: a duplicate or an expired hash is dropped silently.
    let tip = s.tip();
    let duplicate = s.landed.iter().any(|l| l.signature == signature);
    let valid = s
        .last_valid(&tx.message.recent_blockhash, tip.slot)
        .is_some_and(|v| tip.height <= v);
    if duplicate || !valid || take(&mut s.script.drop_sends) {
        return Ok(answer);
    }
    if take(&mut s.script.hold_sends) {
        s.held.push((tx, bytes));
        return Ok(answer);
    }
    // The token program's "insufficient funds" (custom error 1) on instruction 0.
    let fail = take(&mut s.script.fail_on_land).then(|| {
        serde_json::from_value::<TransactionError>(json!({"InstructionError": [0, {"Custom": 1}]}))
            .expect("a transaction error")
    });
    let _ = land(s, tx, bytes, fail);
    if take(&mut s.script.hang_sends_after) {
        return Err(Hang);
    }
    Ok(answer)
}

/// Waits until `f` holds, polling (the fake's state changes from other tasks).
pub async fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
