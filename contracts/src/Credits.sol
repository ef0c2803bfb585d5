// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @notice Nectar Credits (NCR): the ERC-20 clients pay with, with EIP-2612 permit.
///         On a devnet an open faucet mints it; on a real network the faucet cap is zero (disabled).
/// @author Nectar
contract Credits is ERC20, ERC20Permit, Ownable {
    /*//////////////////////////////////////////////////////////////
                                 ERRORS
    //////////////////////////////////////////////////////////////*/

    /// @dev Fires when `faucet` is called on a deployment whose faucet cap is zero.
    error FaucetDisabled();

    /// @dev Fires when one `faucet` call asks for more than `faucetCap`.
    error FaucetCapExceeded(uint256 requested, uint256 cap);

    /*//////////////////////////////////////////////////////////////
                                 EVENTS
    //////////////////////////////////////////////////////////////*/

    /// @dev Emitted when the faucet mints `amount` to `to` (a Transfer from zero is emitted too).
    event FaucetMinted(address indexed caller, address indexed to, uint256 amount);

    /*//////////////////////////////////////////////////////////////
                                 STORAGE
    //////////////////////////////////////////////////////////////*/

    /// @notice Most the faucet mints per call; zero disables it.
    uint256 public immutable faucetCap;

    /*//////////////////////////////////////////////////////////////
                               CONSTRUCTOR
    //////////////////////////////////////////////////////////////*/

    /// @param owner_ May mint without limit (treasury / bridge on a real network).
    /// @param faucetCap_ Per-call faucet limit; zero on any network where credits must be paid for.
    constructor(address owner_, uint256 faucetCap_)
        ERC20("Nectar Credits", "NCR")
        ERC20Permit("Nectar Credits")
        Ownable(owner_)
    {
        faucetCap = faucetCap_;
    }

    /*//////////////////////////////////////////////////////////////
                              PUBLIC WRITES
    //////////////////////////////////////////////////////////////*/

    /// @notice Mints credits to `to`.
    /// @dev Owner only.
    function mint(address to, uint256 amount) external onlyOwner {
        _mint(to, amount);
    }

    /// @notice Devnet faucet: anyone mints up to `faucetCap` credits per call to `to`.
    /// @dev Reverts with `FaucetDisabled` when the cap is zero and `FaucetCapExceeded` above it.
    function faucet(address to, uint256 amount) external {
        uint256 cap = faucetCap;
        if (cap == 0) revert FaucetDisabled();
        if (amount > cap) revert FaucetCapExceeded(amount, cap);
        _mint(to, amount);
        emit FaucetMinted(msg.sender, to, amount);
    }
}
