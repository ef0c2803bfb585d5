// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @notice The credits vault. Clients deposit credits and may withdraw only after an unlock delay, so settlement can
///         still collect for work already done; payees (nodes, the fee recipient) withdraw what settlement credited.
///         A client may also move part of its escrow into a reserve for one node (Livepeer's TicketBroker reserve,
///         per named node): settlement pays that node's vouchers from the free balance first and draws on the
///         reserve only for what the free balance no longer covers, no other node's voucher can touch it, and it
///         leaves only through a release that takes the unlock delay. A node can therefore serve up to the reserve
///         without trusting the client: over-committing the free balance to other nodes or withdrawing it cannot
///         take the reserve away (issue 20).
/// @dev Settlement inherits the vault and moves balances to earnings itself: keeping the balances in the contract
///      that settles saves a cross-contract call, its ABI encoding and a second loop per batch (~580 gas per voucher
///      at 10 clients x 10 nodes, benchmarks/gas). Invariant: credits.balanceOf(this) == sum(client balances) +
///      sum(reserves) + sum(unwithdrawn earnings).
/// @author Nectar
abstract contract Escrow is Ownable {
    using SafeERC20 for IERC20;

    /*//////////////////////////////////////////////////////////////
                                 ERRORS
    //////////////////////////////////////////////////////////////*/

    /// @dev Fires when an amount that must be positive is zero.
    error ZeroAmount();

    /// @dev Fires when a client asks to withdraw more than its balance.
    error InsufficientBalance(uint256 requested, uint256 available);

    /// @dev Fires when `withdraw` is called without a pending withdrawal request.
    error NoPendingWithdrawal();

    /// @dev Fires when `withdraw` is called before the request's unlock time.
    error WithdrawalLocked(uint256 unlockAt);

    /// @dev Fires when `withdrawEarnings` finds nothing to pay.
    error NoEarnings();

    /// @dev Fires when an amount does not fit the 128-bit accounting fields.
    error AmountTooLarge();

    /// @dev Fires when a reserve is made for the zero address or for the client itself.
    error BadReserveNode();

    /// @dev Fires when a client asks to release more than its reserve for `node` holds.
    error InsufficientReserve(address node, uint256 requested, uint256 available);

    /// @dev Fires when `releaseReserve` is called without a pending release request for that node.
    error NoPendingRelease(address node);

    /// @dev Fires when `releaseReserve` is called before the request's release time.
    error ReleaseLocked(address node, uint256 releaseAt);

    /*//////////////////////////////////////////////////////////////
                                 EVENTS
    //////////////////////////////////////////////////////////////*/

    /// @dev Emitted when `client`'s escrow grows by `amount`, to `balance`.
    event Deposited(address indexed client, uint256 amount, uint256 balance);

    /// @dev Emitted when `client` asks to withdraw `amount`, available from `unlockAt`.
    event WithdrawalRequested(address indexed client, uint256 amount, uint256 unlockAt);

    /// @dev Emitted when `client` takes `amount` out of escrow.
    event Withdrawn(address indexed client, uint256 amount);

    /// @dev Emitted when settlement charges `client`'s escrow `amount`, leaving `balance`.
    event Charged(address indexed client, uint256 amount, uint256 balance);

    /// @dev Emitted when settlement credits `payee` (a node or the fee recipient) with `amount`.
    event EarningsCredited(address indexed payee, uint256 amount);

    /// @dev Emitted when `payee` withdraws `amount` of earnings.
    event EarningsWithdrawn(address indexed payee, uint256 amount);

    /// @dev Emitted when `client` moves `amount` of its escrow into its reserve for `node`, now `reserve`.
    event ReserveFunded(address indexed client, address indexed node, uint256 amount, uint256 reserve);

    /// @dev Emitted when `client` asks to release `amount` of its reserve for `node`, possible from `releaseAt`.
    ///      Nodes (through the ledger) settle that client's vouchers at once when they see it.
    event ReserveReleaseRequested(address indexed client, address indexed node, uint256 amount, uint256 releaseAt);

    /// @dev Emitted when `amount` of `client`'s reserve for `node` returns to its free escrow balance.
    event ReserveReleased(address indexed client, address indexed node, uint256 amount);

    /// @dev Emitted when settlement pays `amount` of a voucher to `node` out of `client`'s reserve for it (the free
    ///      balance did not cover it), leaving `reserve`.
    event ReserveDrawn(address indexed client, address indexed node, uint256 amount, uint256 reserve);

    /*//////////////////////////////////////////////////////////////
                                 STORAGE
    //////////////////////////////////////////////////////////////*/

    /// @dev One slot per client: settlement touches only this slot.
    struct ClientAccount {
        uint128 balance; // credits available to settlement
        uint128 pending; // amount of the open withdrawal request (still spendable until withdrawn)
    }

    /// @dev Earnings are kept as two running totals so the slot never returns to zero after the first credit:
    ///      re-crediting a payee after a withdrawal costs a nonzero->nonzero write, not a fresh 20k one.
    struct PayeeAccount {
        uint128 credited;
        uint128 withdrawn;
    }

    /// @dev A client's reserve for one node. Its first field is the low 128 bits of the slot, which the settle loop
    ///      reads and lowers in place (Settlement._settleVouchers).
    struct ReserveAccount {
        uint128 amount; // drawable by settlement for this node's vouchers only
        uint128 pending; // amount of the open release request (still drawable until released)
    }

    IERC20 public immutable credits;

    /// @notice Seconds between a withdrawal request and the moment it can be executed.
    uint256 public immutable unlockDelay;


    mapping(address client => ClientAccount) internal _clients;
    mapping(address client => uint256) public unlockAt;
    mapping(address payee => PayeeAccount) internal _payees;
    mapping(address client => mapping(address node => ReserveAccount)) internal _reserves;
    mapping(address client => mapping(address node => uint256)) internal _releaseAt;

    /*//////////////////////////////////////////////////////////////
                               CONSTRUCTOR
    //////////////////////////////////////////////////////////////*/

    /// @param credits_ The Credits token held in escrow.
    /// @param unlockDelay_ Seconds between a withdrawal request and the withdrawal.
    /// @param owner_ The contract's owner (Settlement: fees and root committers).
    constructor(IERC20 credits_, uint256 unlockDelay_, address owner_) Ownable(owner_) {
        credits = credits_;
        unlockDelay = unlockDelay_;
    }

    /*//////////////////////////////////////////////////////////////
                                INTERNAL
    //////////////////////////////////////////////////////////////*/

    function _toU128(uint256 value) internal pure returns (uint128) {
        if (value > type(uint128).max) revert AmountTooLarge();
        // forge-lint: disable-next-line(unsafe-typecast) -- checked just above
        return uint128(value);
    }

    function _deposit(address client, uint256 amount) internal {
        if (amount == 0) revert ZeroAmount();
        credits.safeTransferFrom(msg.sender, address(this), amount);
        ClientAccount storage account = _clients[client];
        uint128 balance = _toU128(account.balance + amount);
        account.balance = balance;
        emit Deposited(client, amount, balance);
    }

    /// @dev Adds settled `amount` to `payee`'s earnings.
    function _credit(address payee, uint256 amount) internal {
        PayeeAccount storage account = _payees[payee];
        account.credited = _toU128(account.credited + amount);
        emit EarningsCredited(payee, amount);
    }

    /*//////////////////////////////////////////////////////////////
                              PUBLIC WRITES
    //////////////////////////////////////////////////////////////*/

    /// @notice Deposits `amount` credits (pre-approved) into the caller's escrow.
    /// @dev Reverts with `ZeroAmount` for zero.
    function deposit(uint256 amount) external {
        _deposit(msg.sender, amount);
    }

    /// @notice Deposits `amount` credits from the caller into `client`'s escrow (top-ups by a third party).
    /// @dev Reverts with `ZeroAmount` for zero.
    function depositFor(address client, uint256 amount) external {
        _deposit(client, amount);
    }

    /// @notice Deposits with an EIP-2612 permit instead of a prior approve, in one transaction.
    /// @dev A permit that fails (e.g. front-run and already used) is ignored; the transfer then needs an allowance.
    function depositWithPermit(uint256 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s) external {
        try IERC20Permit(address(credits)).permit(msg.sender, address(this), amount, deadline, v, r, s) {} catch {}
        _deposit(msg.sender, amount);
    }

    /// @notice Asks to withdraw `amount`; executable with `withdraw` after `unlockDelay`. Replaces any open request.
    /// @dev The amount stays spendable by settlement until withdrawn. Reverts with `ZeroAmount` or
    ///      `InsufficientBalance`.
    function requestWithdrawal(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        ClientAccount storage account = _clients[msg.sender];
        if (amount > account.balance) revert InsufficientBalance(amount, account.balance);
        // forge-lint: disable-next-line(unsafe-typecast)
        account.pending = uint128(amount); // safe: amount <= balance, a uint128
        uint256 at = block.timestamp + unlockDelay;
        unlockAt[msg.sender] = at;
        emit WithdrawalRequested(msg.sender, amount, at);
    }

    /// @notice Executes the caller's withdrawal request: pays min(requested, current balance).
    /// @dev Reverts with `NoPendingWithdrawal` or `WithdrawalLocked(unlockAt)`.
    function withdraw() external returns (uint256 amount) {
        ClientAccount storage account = _clients[msg.sender];
        amount = account.pending;
        if (amount == 0) revert NoPendingWithdrawal();
        uint256 at = unlockAt[msg.sender];
        // forge-lint: disable-next-line(block-timestamp) -- unlock delays are hours, far above any validator skew
        if (block.timestamp < at) revert WithdrawalLocked(at);
        if (amount > account.balance) amount = account.balance; // settlement spent part of it meanwhile
        account.pending = 0;
        unchecked {
            // forge-lint: disable-next-line(unsafe-typecast)
            account.balance -= uint128(amount); // safe: amount <= balance just above
        }
        delete unlockAt[msg.sender];
        if (amount > 0) credits.safeTransfer(msg.sender, amount);
        emit Withdrawn(msg.sender, amount);
    }

    /// @notice Moves `amount` of the caller's free escrow into its reserve for `node`: only vouchers to `node` can
    ///         draw on it, after the free balance, and it comes back only through `requestReserveRelease` and
    ///         `releaseReserve` (the unlock delay). Nodes extend credit against it.
    /// @dev Reverts with `ZeroAmount`, `BadReserveNode` or `InsufficientBalance`. An open withdrawal request is paid
    ///      from what is left free (withdraw pays at most the balance).
    function reserve(address node, uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        if (node == address(0) || node == msg.sender) revert BadReserveNode();
        ClientAccount storage account = _clients[msg.sender];
        if (amount > account.balance) revert InsufficientBalance(amount, account.balance);
        unchecked {
            // forge-lint: disable-next-line(unsafe-typecast)
            account.balance -= uint128(amount); // safe: amount <= balance just above
        }
        ReserveAccount storage r = _reserves[msg.sender][node];
        uint128 held = _toU128(r.amount + amount);
        r.amount = held;
        emit ReserveFunded(msg.sender, node, amount, held);
    }

    /// @notice Asks to release `amount` of the caller's reserve for `node`; executable with `releaseReserve` after
    ///         `unlockDelay`, during which `node` can still settle against it. Replaces any open request for `node`.
    /// @dev Reverts with `ZeroAmount` or `InsufficientReserve`.
    function requestReserveRelease(address node, uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        ReserveAccount storage r = _reserves[msg.sender][node];
        if (amount > r.amount) revert InsufficientReserve(node, amount, r.amount);
        // forge-lint: disable-next-line(unsafe-typecast)
        r.pending = uint128(amount); // safe: amount <= r.amount, a uint128
        uint256 at = block.timestamp + unlockDelay;
        _releaseAt[msg.sender][node] = at;
        emit ReserveReleaseRequested(msg.sender, node, amount, at);
    }

    /// @notice Executes the caller's release request for `node`: min(requested, what is left of the reserve) returns
    ///         to the caller's free escrow balance (withdraw it with `requestWithdrawal` / `withdraw`).
    /// @dev Reverts with `NoPendingRelease` or `ReleaseLocked`.
    function releaseReserve(address node) external returns (uint256 amount) {
        ReserveAccount storage r = _reserves[msg.sender][node];
        amount = r.pending;
        if (amount == 0) revert NoPendingRelease(node);
        uint256 at = _releaseAt[msg.sender][node];
        // forge-lint: disable-next-line(block-timestamp) -- unlock delays are hours, far above any validator skew
        if (block.timestamp < at) revert ReleaseLocked(node, at);
        if (amount > r.amount) amount = r.amount; // settlement drew on it meanwhile
        r.pending = 0;
        unchecked {
            // forge-lint: disable-next-line(unsafe-typecast)
            r.amount -= uint128(amount); // safe: amount <= r.amount just above
        }
        delete _releaseAt[msg.sender][node];
        ClientAccount storage account = _clients[msg.sender];
        account.balance = _toU128(account.balance + amount);
        emit ReserveReleased(msg.sender, node, amount);
    }

    /// @notice Pays the caller (a node, or the fee recipient) all its settled earnings.
    /// @dev Reverts with `NoEarnings` when there is nothing to pay.
    function withdrawEarnings() external returns (uint256 amount) {
        PayeeAccount storage account = _payees[msg.sender];
        amount = account.credited - account.withdrawn;
        if (amount == 0) revert NoEarnings();
        account.withdrawn = account.credited;
        credits.safeTransfer(msg.sender, amount);
        emit EarningsWithdrawn(msg.sender, amount);
    }

    /*//////////////////////////////////////////////////////////////
                              PUBLIC READS
    //////////////////////////////////////////////////////////////*/

    /// @notice Credits in `client`'s free escrow, available to settlement for any node (includes any pending
    ///         withdrawal; reserves are apart, see `reserveOf`).
    function balanceOf(address client) external view returns (uint256) {
        return _clients[client].balance;
    }

    /// @notice The open withdrawal request of `client`: amount and unlock time (zeros when none).
    function pendingWithdrawal(address client) external view returns (uint256 amount, uint256 at) {
        return (_clients[client].pending, unlockAt[client]);
    }

    /// @notice `client`'s reserve for `node`: the amount settlement can draw for `node`'s vouchers, the amount of an
    ///         open release request (drawable until released) and when it can be released (zeros when none).
    function reserveOf(address client, address node)
        external
        view
        returns (uint256 amount, uint256 pendingRelease, uint256 releaseAt)
    {
        ReserveAccount storage r = _reserves[client][node];
        return (r.amount, r.pending, _releaseAt[client][node]);
    }

    /// @notice Settled, not yet withdrawn earnings of `payee`.
    function earningsOf(address payee) external view returns (uint256) {
        PayeeAccount storage account = _payees[payee];
        return account.credited - account.withdrawn;
    }
}
